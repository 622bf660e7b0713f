from fromage.train.run import main

main()
